package fusefs

import "github.com/hanwen/go-fuse/v2/fs"

// Compile-time checks that the nodes implement the go-fuse interfaces they
// are meant to: a typo in a method signature would otherwise silently fall
// back to go-fuse's default behaviour.

var (
	_ = (fs.InodeEmbedder)((*rootNode)(nil))
	_ = (fs.NodeOnAdder)((*rootNode)(nil))
	_ = (fs.NodeGetattrer)((*rootNode)(nil))
	_ = (fs.NodeReaddirer)((*rootNode)(nil))
	_ = (fs.NodeStatfser)((*rootNode)(nil))
	_ = (fs.NodeFsyncer)((*rootNode)(nil))
	_ = (fs.NodeSetattrer)((*rootNode)(nil))
	_ = (fs.NodeCreater)((*rootNode)(nil))
	_ = (fs.NodeTmpfiler)((*rootNode)(nil))
	_ = (fs.NodeMkdirer)((*rootNode)(nil))
	_ = (fs.NodeMknoder)((*rootNode)(nil))
	_ = (fs.NodeLinker)((*rootNode)(nil))
	_ = (fs.NodeSymlinker)((*rootNode)(nil))
	_ = (fs.NodeUnlinker)((*rootNode)(nil))
	_ = (fs.NodeRmdirer)((*rootNode)(nil))
	_ = (fs.NodeRenamer)((*rootNode)(nil))
	_ = (fs.NodeSetxattrer)((*rootNode)(nil))
	_ = (fs.NodeRemovexattrer)((*rootNode)(nil))
)

var (
	_ = (fs.InodeEmbedder)((*fileNode)(nil))
	_ = (fs.NodeGetattrer)((*fileNode)(nil))
	_ = (fs.NodeOpener)((*fileNode)(nil))
	_ = (fs.NodeReader)((*fileNode)(nil))
	_ = (fs.NodeLseeker)((*fileNode)(nil))
	_ = (fs.NodeGetxattrer)((*fileNode)(nil))
	_ = (fs.NodeListxattrer)((*fileNode)(nil))
	_ = (fs.NodeStatfser)((*fileNode)(nil))
	_ = (fs.NodeFsyncer)((*fileNode)(nil))
	_ = (fs.NodeFlusher)((*fileNode)(nil))
	_ = (fs.NodeSetattrer)((*fileNode)(nil))
	_ = (fs.NodeWriter)((*fileNode)(nil))
	_ = (fs.NodeAllocater)((*fileNode)(nil))
	_ = (fs.NodeSetxattrer)((*fileNode)(nil))
	_ = (fs.NodeRemovexattrer)((*fileNode)(nil))
)
