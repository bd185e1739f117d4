from moeshard_cli.cli import console

console()
