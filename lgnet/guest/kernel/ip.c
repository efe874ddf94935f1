/*
 * ip.c - a very small network stack: ARP, IPv4, ICMP echo and UDP echo.
 *
 * Just enough to be pinged, to ping, and to echo UDP datagrams sent to port 7
 * (RFC 862), so that the tests have real frames to look at.  Everything runs
 * in the receive interrupt: a frame comes in, a reply goes straight out.
 * Replies go back to the sender's Ethernet address, so only our own pings
 * need the ARP cache.  No fragments, no options, no routing beyond "which of
 * my nets is this address on".
 *
 * Checksums: we always compute them on the way out.  On the way in, the
 * IPv4 header checksum is always checked; ICMP and UDP checksums only when
 * the device lacks LGUEST_NET_F_NOCSUM, which is lguest's "this net does not
 * corrupt frames, do not bother" (Linux then marked frames CHECKSUM_UNNECESSARY),
 * or the command line says csum (lgnet's nets can corrupt frames on request).
 * Every failed checksum is counted (net_report's "checksum errors").
 */
#include "kernel.h"

#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ARPHRD_ETHER 1
#define ARP_REQUEST 1
#define ARP_REPLY 2
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define IP_DEFAULT_TTL 64
#define IP_FRAG_MASK 0x3FFF		/* "more fragments" and the offset */
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define UDP_ECHO_PORT 7
#define PING_DATA 56			/* ping's default: 64 bytes of ICMP */
#define ARP_RETRY_NS (250 * NSEC_PER_MSEC)

struct ethhdr {
	u8 dst[ETH_ALEN], src[ETH_ALEN];
	u16 proto;
} __attribute__((packed));

struct arp_ipv4 {
	u16 htype, ptype;
	u8 hlen, plen;
	u16 op;
	u8 sha[ETH_ALEN];
	u32 spa;
	u8 tha[ETH_ALEN];
	u32 tpa;
} __attribute__((packed));

struct iphdr {
	u8 ver_ihl, tos;
	u16 tot_len, id, frag;
	u8 ttl, proto;
	u16 check;
	u32 saddr, daddr;
} __attribute__((packed));

struct icmphdr {
	u8 type, code;
	u16 check, id, seq;
} __attribute__((packed));

struct udphdr {
	u16 sport, dport, len, check;
} __attribute__((packed));

static const u8 broadcast[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

/* --- the Internet checksum (RFC 1071) ------------------------------------- */

/* The Internet checksum's sum, which callers add and fold in network order.
 * A ones'-complement sum does not care in which order each word's two bytes
 * come (RFC 1071), so we add the data as our own little-endian words, four
 * bytes at a time (half the instructions of a byte pair at a time, and under
 * Unicorn every instruction costs), and swap the folded result once. */
typedef u32 __attribute__((may_alias)) unaligned_u32;
typedef u16 __attribute__((may_alias)) unaligned_u16;

static u32 csum_add(u32 sum, const void *data, unsigned int len)
{
	const u8 *p = data;
	u64 native = 0;

	for (; len >= 4; p += 4, len -= 4)
		native += *(const unaligned_u32 *)p;
	if (len >= 2) {
		native += *(const unaligned_u16 *)p;
		p += 2;
		len -= 2;
	}
	if (len)
		native += p[0];
	while (native >> 16)
		native = (native & 0xFFFF) + (native >> 16);
	return sum + (u16)((native << 8) | (native >> 8));
}

static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (u16)~sum;
}

/* UDP's checksum also covers a pseudo-header of addresses and length. */
static u16 udp_csum(u32 saddr, u32 daddr, const void *udp, unsigned int len)
{
	u32 sum = (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF)
		  + IPPROTO_UDP + len;

	return csum_fold(csum_add(sum, udp, len));
}

/* --- ARP ------------------------------------------------------------------ */

#define ARP_CACHE_SIZE 16
static struct {
	u32 ip;
	u8 mac[ETH_ALEN];
} arp_cache[ARP_CACHE_SIZE];
static unsigned int arp_next;

static const u8 *arp_lookup(u32 ip)
{
	unsigned int i;

	for (i = 0; i < ARP_CACHE_SIZE; i++)
		if (arp_cache[i].ip == ip && ip)
			return arp_cache[i].mac;
	return NULL;
}

static void arp_learn(u32 ip, const u8 *mac)
{
	u8 *slot = (u8 *)arp_lookup(ip);

	if (!slot) {
		arp_cache[arp_next].ip = ip;
		slot = arp_cache[arp_next].mac;
		arp_next = (arp_next + 1) % ARP_CACHE_SIZE;
	}
	memcpy(slot, mac, ETH_ALEN);
}

/* What we learned, printed at power-down like `arp -n`. */
void arp_report(void)
{
	unsigned int i;

	for (i = 0; i < ARP_CACHE_SIZE; i++) {
		const u8 *m = arp_cache[i].mac;

		if (arp_cache[i].ip)
			printk("arp: " IP_FMT " at %02x:%02x:%02x:%02x:%02x:%02x\n",
			       IP_ARGS(arp_cache[i].ip), m[0], m[1], m[2], m[3], m[4], m[5]);
	}
}

/* Start a frame in the transmit buffer; returns where its payload goes. */
static void *eth_build(struct net_dev *dev, const u8 *dst, u16 proto)
{
	struct ethhdr *eth = (struct ethhdr *)net_tx_buffer();

	memcpy(eth->dst, dst, ETH_ALEN);
	memcpy(eth->src, dev->mac, ETH_ALEN);
	eth->proto = htons(proto);
	return eth + 1;
}

static void arp_send(struct net_dev *dev, u16 op, const u8 *eth_dst,
		     const u8 *tha, u32 tpa)
{
	u32 flags = irq_save();
	struct arp_ipv4 *arp = eth_build(dev, eth_dst, ETH_P_ARP);

	arp->htype = htons(ARPHRD_ETHER);
	arp->ptype = htons(ETH_P_IP);
	arp->hlen = ETH_ALEN;
	arp->plen = 4;
	arp->op = htons(op);
	memcpy(arp->sha, dev->mac, ETH_ALEN);
	arp->spa = htonl(dev->ip);
	memcpy(arp->tha, tha, ETH_ALEN);
	arp->tpa = htonl(tpa);
	net_xmit(dev, sizeof(struct ethhdr) + sizeof(*arp));
	irq_restore(flags);
}

static void arp_input(struct net_dev *dev, const u8 *p, unsigned int len)
{
	const struct arp_ipv4 *arp = (const void *)p;
	u32 spa, tpa;

	if (len < sizeof(*arp) || ntohs(arp->htype) != ARPHRD_ETHER
	    || ntohs(arp->ptype) != ETH_P_IP || arp->hlen != ETH_ALEN || arp->plen != 4)
		return;
	spa = ntohl(arp->spa);
	tpa = ntohl(arp->tpa);
	if (!dev->ip || tpa != dev->ip)
		return;
	/* Whoever asks for us or answers us is worth remembering. */
	arp_learn(spa, arp->sha);
	if (ntohs(arp->op) == ARP_REQUEST)
		arp_send(dev, ARP_REPLY, arp->sha, arp->sha, spa);
}

static u32 arp_wanted;

static int arp_known(void)
{
	return arp_lookup(arp_wanted) != NULL;
}

/* Ask every quarter second until someone answers or the time is up. */
int arp_resolve(struct net_dev *dev, u32 ip, u64 timeout_ns)
{
	u64 deadline = now_ns() + timeout_ns;

	arp_wanted = ip;
	while (!arp_known() && now_ns() < deadline) {
		u64 retry = now_ns() + ARP_RETRY_NS;

		arp_send(dev, ARP_REQUEST, broadcast, (const u8 *)"\0\0\0\0\0\0", ip);
		wait_until(retry < deadline ? retry : deadline, arp_known);
	}
	return arp_known();
}

/* --- IPv4 ----------------------------------------------------------------- */

static u16 ip_ident;

static void *ip_build(struct net_dev *dev, const u8 *dst_mac, u32 daddr, u8 proto,
		      unsigned int len)
{
	struct iphdr *ip = eth_build(dev, dst_mac, ETH_P_IP);

	ip->ver_ihl = 0x45;	/* version 4, 5 words of header */
	ip->tos = 0;
	ip->tot_len = htons(sizeof(*ip) + len);
	ip->id = htons(ip_ident++);
	ip->frag = 0;
	ip->ttl = IP_DEFAULT_TTL;
	ip->proto = proto;
	ip->check = 0;
	ip->saddr = htonl(dev->ip);
	ip->daddr = htonl(daddr);
	ip->check = htons(csum_fold(csum_add(0, ip, sizeof(*ip))));
	return ip + 1;
}

static void ip_send(struct net_dev *dev, unsigned int len)
{
	net_xmit(dev, sizeof(struct ethhdr) + sizeof(struct iphdr) + len);
}

/* The net an address is on (by netmask), else the first configured one. */
struct net_dev *route(u32 dst)
{
	unsigned int i;

	for (i = 0; i < num_net_devs; i++)
		if (net_devs[i].up && net_devs[i].ip
		    && (dst & net_devs[i].netmask) == (net_devs[i].ip & net_devs[i].netmask))
			return &net_devs[i];
	for (i = 0; i < num_net_devs; i++)
		if (net_devs[i].up && net_devs[i].ip)
			return &net_devs[i];
	return NULL;
}

/* --- ICMP ----------------------------------------------------------------- */

/* Echo replies to our own pings wait here for main.c. */
#define REPLY_RING 32
static struct ping_reply replies[REPLY_RING];
static unsigned int reply_head, reply_tail;
static u16 ping_ident;

int ping_take_reply(struct ping_reply *reply)
{
	if (reply_tail == reply_head)
		return 0;
	*reply = replies[reply_tail % REPLY_RING];
	reply_tail++;
	return 1;
}

/* After the send time, an echo request's data byte i is i, as ping(8)'s. */
static const u8 ping_pattern[PING_DATA] = {
#define P8(n) n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7
	P8(0), P8(8), P8(16), P8(24), P8(32), P8(40), P8(48),
#undef P8
};

/* Like ping(8), we carry the send time in the first 8 bytes of the data, so
 * the round trip needs no table: it is "now" minus what came back. */
void ping_send(struct net_dev *dev, u32 dst, u16 id, u16 seq)
{
	u32 flags = irq_save();
	const u8 *mac = arp_lookup(dst);
	struct icmphdr *icmp;
	unsigned int len = sizeof(*icmp) + PING_DATA;
	u8 *data;
	u64 sent;

	ping_ident = id;
	if (!mac) {
		/* Nobody answered our ARP: the request is all we can send. */
		irq_restore(flags);
		arp_send(dev, ARP_REQUEST, broadcast, (const u8 *)"\0\0\0\0\0\0", dst);
		return;
	}
	icmp = ip_build(dev, mac, dst, IPPROTO_ICMP, len);
	icmp->type = ICMP_ECHO;
	icmp->code = 0;
	icmp->check = 0;
	icmp->id = htons(id);
	icmp->seq = htons(seq);
	data = (u8 *)(icmp + 1);
	sent = now_ns();
	memcpy(data, &sent, sizeof(sent));
	memcpy(data + sizeof(sent), ping_pattern + sizeof(sent), PING_DATA - sizeof(sent));
	icmp->check = htons(csum_fold(csum_add(0, icmp, len)));
	ip_send(dev, len);
	irq_restore(flags);
}

static void icmp_input(struct net_dev *dev, const u8 *src_mac, u32 saddr, int unicast,
		       const u8 *p, unsigned int len)
{
	const struct icmphdr *icmp = (const void *)p;

	if (len < sizeof(*icmp))
		return;
	if (!dev->nocsum && csum_fold(csum_add(0, p, len)) != 0) {
		dev->rx_csum_errors++;
		return;
	}

	if (icmp->type == ICMP_ECHO && unicast) {
		struct icmphdr *out = ip_build(dev, src_mac, saddr, IPPROTO_ICMP, len);

		memcpy(out, p, len);
		out->type = ICMP_ECHOREPLY;
		out->check = 0;
		out->check = htons(csum_fold(csum_add(0, out, len)));
		ip_send(dev, len);
	} else if (icmp->type == ICMP_ECHOREPLY && ntohs(icmp->id) == ping_ident
		   && len >= sizeof(*icmp) + sizeof(u64)) {
		struct ping_reply *r = &replies[reply_head % REPLY_RING];
		u64 sent, now = now_ns();

		memcpy(&sent, icmp + 1, sizeof(sent));
		if (sent > now || reply_head - reply_tail >= REPLY_RING)
			return;
		r->seq = ntohs(icmp->seq);
		r->from = saddr;
		r->rtt_ns = now - sent;
		reply_head++;
	}
}

/* --- UDP: the echo service ------------------------------------------------ */

static void udp_input(struct net_dev *dev, const u8 *src_mac, u32 saddr, u32 daddr,
		      int unicast, const u8 *p, unsigned int len)
{
	const struct udphdr *udp = (const void *)p;
	struct udphdr *out;
	unsigned int ulen;
	u16 check;

	if (len < sizeof(*udp))
		return;
	ulen = ntohs(udp->len);
	if (ulen < sizeof(*udp) || ulen > len)
		return;
	/* A zero checksum means "none" in IPv4. */
	if (!dev->nocsum && udp->check && udp_csum(saddr, daddr, p, ulen) != 0) {
		dev->rx_csum_errors++;
		return;
	}
	if (!unicast || ntohs(udp->dport) != UDP_ECHO_PORT)
		return;

	out = ip_build(dev, src_mac, saddr, IPPROTO_UDP, ulen);
	memcpy(out, p, ulen);
	out->sport = udp->dport;
	out->dport = udp->sport;
	out->check = 0;
	check = udp_csum(dev->ip, saddr, out, ulen);
	out->check = htons(check ? check : 0xFFFF);
	ip_send(dev, ulen);
}

static void ip_input(struct net_dev *dev, const u8 *src_mac, const u8 *p, unsigned int len)
{
	const struct iphdr *ip = (const void *)p;
	unsigned int ihl, tot;
	u32 saddr, daddr;
	int unicast;

	if (len < sizeof(*ip) || (ip->ver_ihl >> 4) != 4)
		return;
	ihl = (ip->ver_ihl & 0xF) * 4;
	tot = ntohs(ip->tot_len);
	if (ihl < sizeof(*ip) || ihl > len || tot < ihl || tot > len)
		return;
	if (csum_fold(csum_add(0, p, ihl)) != 0) {
		dev->rx_csum_errors++;
		return;
	}
	if (ntohs(ip->frag) & IP_FRAG_MASK)
		return;
	saddr = ntohl(ip->saddr);
	daddr = ntohl(ip->daddr);
	unicast = daddr == dev->ip;
	if (!dev->ip || (!unicast && daddr != 0xFFFFFFFF && daddr != (dev->ip | ~dev->netmask)))
		return;

	if (ip->proto == IPPROTO_ICMP)
		icmp_input(dev, src_mac, saddr, unicast, p + ihl, tot - ihl);
	else if (ip->proto == IPPROTO_UDP)
		udp_input(dev, src_mac, saddr, daddr, unicast, p + ihl, tot - ihl);
}

/* Every believable frame from net.c's receive interrupt comes here. */
void eth_input(struct net_dev *dev, const u8 *frame, unsigned int len)
{
	const struct ethhdr *eth = (const void *)frame;

	/* Promiscuous or not, we only want our own frames and multicast. */
	if (!(eth->dst[0] & 1) && memcmp(eth->dst, dev->mac, ETH_ALEN) != 0)
		return;
	if (ntohs(eth->proto) == ETH_P_ARP)
		arp_input(dev, frame + sizeof(*eth), len - sizeof(*eth));
	else if (ntohs(eth->proto) == ETH_P_IP)
		ip_input(dev, eth->src, frame + sizeof(*eth), len - sizeof(*eth));
}

/* "10.0.0.2" -> 0x0A000002; 0 if it is not a dotted quad. */
u32 parse_ip(const char **s)
{
	u32 ip = 0;
	unsigned int i;

	for (i = 0; i < 4; i++) {
		const char *start = *s;
		u32 part = parse_uint(s);

		if (*s == start || part > 255 || (i < 3 && **s != '.'))
			return 0;
		if (i < 3)
			(*s)++;
		ip = (ip << 8) | part;
	}
	return ip;
}
