import sys

from cvt.cli import main

sys.exit(main())
