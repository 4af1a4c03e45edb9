"""`python -m easyanimate ...`: see easyanimate/cli.py."""
import sys

from .cli import main

sys.exit(main())
