from lrdeploy.cli import main

raise SystemExit(main())
