from cyclegan.cli import main

raise SystemExit(main())
