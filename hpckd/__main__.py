import sys

from hpckd.cli import main

sys.exit(main())
