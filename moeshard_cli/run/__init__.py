"""`moeshard run`: stream a text file through the sharded encoder, one worker per rank.

input file -> windows of lines (inputs.py) -> each rank tokenizes its share, the ranks swap
token ids so every step is balanced (feed.py, schedule.py) -> worker encode loop (worker.py)
-> rows gathered on rank 0 and written in place (outputs.py), with a journal that makes an
interrupted run resumable. command.py is the parent side: checks, launch, finalize, summary.
"""
