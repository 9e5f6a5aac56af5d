from fedmem.simulate import exit_with, main

exit_with(main())
