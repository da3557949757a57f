package pxe

import (
	"fmt"
	"net/url"
	"path"
	"strings"
)

// EntryScript is what DHCP points iPXE at: it asks for the script of the
// NIC it booted from.
func EntryScript() string {
	return "#!ipxe\n# kiln: fetch this machine's own script\nchain --autofree " + ScriptPath + "?mac=${netX/mac:hexhyp} || goto refused\nexit\n:refused\necho kiln: this machine (${netX/mac}) is not in the cluster's inventory\nexit 1\n"
}

// ConfigURL is where a node booted from mac fetches its config. The MAC is
// written as iPXE's hexhyp (52-54-00-12-34-56) and the token is hex: the
// URL needs no escaping on a kernel command line.
func (m *Manifest) ConfigURL(n *Node, mac string) string {
	return strings.TrimSuffix(m.ServerURL, "/") + ConfigPath + n.Name + "?mac=" + strings.ReplaceAll(mac, ":", "-") + "&token=" + n.Token
}

// ReportURL is where the node's agent POSTs its status.
func (m *Manifest) ReportURL(n *Node) string {
	return strings.TrimSuffix(m.ServerURL, "/") + ReportPath + n.Name + "?" + url.Values{"key": {n.ReportKey}}.Encode()
}

func (m *Manifest) assetURL(a Asset) string {
	return strings.TrimSuffix(m.ServerURL, "/") + AssetPath + a.File
}

// Script is the iPXE script of a node booting from the NIC mac: the OS's
// kernel and initramfs from the server, the config URL with the node's
// token on the kernel command line.
func (m *Manifest) Script(n *Node, mac string) string {
	return m.script(n, m.assetURL, []string{"ignition.config.url=" + m.ConfigURL(n, mac)}, nil)
}

// OfflineScript boots a node with no config server: kernel, initramfs
// (and rootfs) are fetched relative to the script, and the config comes
// as one more initramfs, configName, beside the script.
func (m *Manifest) OfflineScript(n *Node, configName string) string {
	rel := func(a Asset) string { return "../../assets/" + a.File }
	return m.script(n, rel, nil, []string{configName})
}

// LocalBootScript answers an install-mode node that is installed: leave
// iPXE so the firmware boots the next device, the disk.
func LocalBootScript(n *Node) string {
	return fmt.Sprintf("#!ipxe\necho kiln: %s is installed, booting from its disk\nexit\n", n.Name)
}

// boot is what a node boots: kernel URL, initramfs URLs, kernel
// arguments.
type boot struct {
	kernel  string
	initrds []string
	args    []string
}

// bootFor assembles a node's boot. Offline (extraInitrds set), a Fedora
// CoreOS rootfs is appended as an initramfs instead of being fetched by
// URL.
func (m *Manifest) bootFor(assetURL func(Asset) string, args, extraInitrds []string) boot {
	var b boot
	if a, ok := m.Asset(AssetInitramfs); ok {
		b.initrds = append(b.initrds, assetURL(a))
	}
	var kargs []string
	if a, ok := m.Asset(AssetRootfs); ok {
		if extraInitrds == nil {
			kargs = append(kargs, m.RootfsArg+"="+assetURL(a))
		} else {
			b.initrds = append(b.initrds, assetURL(a))
		}
	}
	b.initrds = append(b.initrds, extraInitrds...)
	// initrd=NAME tells an EFI kernel which loaded images to use.
	for _, u := range b.initrds {
		b.args = append(b.args, "initrd="+path.Base(strings.SplitN(u, "?", 2)[0]))
	}
	b.args = append(append(append(b.args, m.KernelArgs...), kargs...), args...)
	kernel, _ := m.Asset(AssetKernel)
	b.kernel = assetURL(kernel)
	return b
}

func (m *Manifest) script(n *Node, assetURL func(Asset) string, args, extraInitrds []string) string {
	b := m.bootFor(assetURL, args, extraInitrds)
	var s strings.Builder
	fmt.Fprintf(&s, "#!ipxe\n# kiln cluster %s: %s (%s, %s)\n", m.Cluster, n.Name, n.Role, n.Mode)
	fmt.Fprintf(&s, "kernel %s %s\n", b.kernel, strings.Join(b.args, " "))
	for _, u := range b.initrds {
		fmt.Fprintf(&s, "initrd %s\n", u)
	}
	s.WriteString("boot\n")
	return s.String()
}
