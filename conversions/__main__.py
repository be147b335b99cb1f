"""`python -m conversions upcycle SRC OUT ...` — the same as the `hf-moe` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
