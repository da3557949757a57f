package serve

import "testing"

// Per-client limits count an IPv6 network's /64 as one client: its
// machines may use any address in it.
func TestClientGroupsIPv6By64(t *testing.T) {
	for addr, want := range map[string]string{
		"10.0.0.7":                "10.0.0.7",
		"::ffff:10.0.0.7":         "::ffff:10.0.0.7",
		"2001:db8:1:2::1":         "2001:db8:1:2::/64",
		"2001:db8:1:2:ffff::9":    "2001:db8:1:2::/64",
		"2001:db8:1:3::1":         "2001:db8:1:3::/64",
		"fe80::1%eth0":            "fe80::/64",
		"not an address (a test)": "not an address (a test)",
	} {
		if got := client(addr); got != want {
			t.Errorf("client(%q) = %q, want %q", addr, got, want)
		}
	}
}
