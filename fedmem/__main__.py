import sys

from fedmem.simulate import main

sys.exit(main())
