"""Entry point `python -m method.param_count`: see method/tools/param_count.py."""
import sys

from method.tools.param_count import main
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
