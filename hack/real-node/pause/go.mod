module pythontask.local/pause

go 1.22
