from relay.cli.app import main

main()
