package nbd

const sysCopyFileRange = 326 // copy_file_range(2) on linux/amd64
