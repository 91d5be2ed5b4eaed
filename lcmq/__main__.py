from lcmq.cli import main

raise SystemExit(main())
