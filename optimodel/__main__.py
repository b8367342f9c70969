import sys

from optimodel.cli import main

sys.exit(main())
