// Package partition reads a disk's partition table through an io.ReaderAt:
// MBR (the "dos" label: primaries and the logical partitions of an extended
// one) and GPT. It owns the answer to "which byte ranges of this disk are
// partitions, and what does each say it holds", numbered as fdisk, sfdisk,
// the kernel and sleuthkit's mmls number them, so that NAME-p5 is what
// `fdisk -l` calls partition 5.
//
// # Numbering
//
// MBR primaries keep their slot, 1 to 4, whether or not the slots before
// them are used. Logical partitions, found by following the chain of
// extended boot records (EBRs) inside the first extended partition, are
// numbered from 5 in chain order; an EBR without a data entry gets no
// number, as fdisk drops such empty links. The extended partition itself is
// listed (as fdisk lists it) with [Partition.Extended] set: it is a
// container, not a data partition. GPT entries are numbered by index + 1;
// empty entries get no partition but keep their number.
//
// # Sector size
//
// GPT is found with 512- or 4096-byte logical sectors: the header is looked
// for at LBA 1 of either size (as sleuthkit does), so a 4Kn disk's table is
// read from an image file or an export that does not say its sector size.
// An MBR without a GPT is read in 512-byte sectors.
//
// # Hostile input
//
// Tables come from disks we do not control, so nothing in them is trusted.
// Every offset is checked against the disk's size before it is read; every
// read is bounded (a sector, an EBR, a GPT entry array of at most
// [MaxEntryArray] bytes); the EBR chain is followed at most [MaxEBRs] links
// and never twice through the same sector. A GPT header or entry array whose
// CRC, size or location is wrong is not used; the backup GPT at the end of
// the disk is tried instead, as fdisk does. A sector 0 without a boot
// signature (wiped or damaged, as gdisk recovers such disks) is no table
// unless a GPT header at LBA 1, else the backup, passes the same checks;
// the note then says which was used. A partition that ends past the
// end of the disk (or of its GPT's usable area, or of its extended
// partition) is skipped, and partitions that overlap each other are all
// skipped, since the table cannot say which one is real. What was skipped
// and why is said in one line, [Table.Note]; when nothing usable is left the
// table has no partitions and the note says why.
//
// [Read] returns an error only when the disk cannot be read; everything a
// table can get wrong is in the returned Table.
//
// BUG(partition): An MBR-only disk with 4096-byte logical sectors is read in
// 512-byte units: its partitions then look eight times smaller and nearer
// the start, or are skipped.
package partition
