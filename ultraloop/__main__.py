"""`python -m ultraloop` runs the `ultraloop` command."""
import sys

from .cli import main

sys.exit(main())
