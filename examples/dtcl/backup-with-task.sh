#!/bin/sh
# The note's SAMPLE_SQL_BACKUP.BAT on Linux: stop the application, let it
# write everything, queue the backup task inline, start the application
# again. New writes fall in behind the task.
set -eu
systemctl stop myapp.service
sleep 5                       # or wait for the application's own "flushed" signal
smirror dtcl -f /etc/smirror/dtcl/task.dtcl --password-file /etc/smirror/dtcl.pw
systemctl start myapp.service
