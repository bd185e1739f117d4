from moeshard_cli.cli import script

script()
