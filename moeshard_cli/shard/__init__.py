"""`moeshard shard`: source checkpoint -> slicing plan -> rank files.

sources.py resolves SOURCE (built-in, local directory, hub id, shard set) into a list of
tensors loaded one at a time; plan.py decides which bytes go to which rank; writer.py streams
them into one safetensors file per rank; manifest.py writes and checks `moeshard.json`, the
contract `run` and `bench` read; command.py is the command.
"""
