import sys

from fastmix.data.embedded.build import main

sys.exit(main())
