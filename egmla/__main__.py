import sys

from egmla.cli import main

sys.exit(main())
