from tcprio.cli import main

raise SystemExit(main())
