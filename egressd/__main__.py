from egressd.cli import main

raise SystemExit(main())
