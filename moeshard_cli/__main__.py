from moeshard_cli.cli import main

main()
