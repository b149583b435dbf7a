from selfheal_kserve.server import main

raise SystemExit(main())
