import sys

from lgnet.cli import main

sys.exit(main())
