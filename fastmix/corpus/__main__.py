import sys

from fastmix.corpus.build import main

sys.exit(main())
