import sys

from overparam.console import main

sys.exit(main())
