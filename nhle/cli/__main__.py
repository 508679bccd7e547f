from nhle.cli.commands import main

raise SystemExit(main())
