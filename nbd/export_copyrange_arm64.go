package nbd

const sysCopyFileRange = 285 // copy_file_range(2) on linux/arm64
