import sys

from rngd.cli import main

sys.exit(main())
