import sys

from hvbatch.cli import main

sys.exit(main())
