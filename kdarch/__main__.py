import sys

from kdarch.cli import main

sys.exit(main())
