"""`python -m ir_lora.restore ...`: the `ir-lora-restore` command."""

from ir_lora.restore import cli

if __name__ == "__main__":
    cli.run()
