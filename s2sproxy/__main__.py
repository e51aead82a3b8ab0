from s2sproxy.cli import main

raise SystemExit(main())
