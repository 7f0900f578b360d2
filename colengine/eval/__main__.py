import sys

from colengine.eval.cli import main

sys.exit(main())
