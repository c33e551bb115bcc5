import sys

from pykata.cli.runtime.entry import main

sys.exit(main())
