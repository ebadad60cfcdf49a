from granite_cli.app import main

main()
