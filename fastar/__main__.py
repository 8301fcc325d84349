from fastar.cli import main

raise SystemExit(main())
