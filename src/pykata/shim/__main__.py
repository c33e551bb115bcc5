import sys

from pykata.shim.main import main

sys.exit(main())
