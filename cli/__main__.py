from rpiae.cli.main import main

main()
