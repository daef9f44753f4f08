import sys

from icnn.cli import main

sys.exit(main())
