/*
 * kernel.h - what the pieces of this little kernel share with each other.
 *
 * Nothing here is lguest ABI (that is lguest.h): these are this kernel's own
 * choices, the memory layout it uses and the functions one file offers the
 * others.  The files, in the order a reader might visit them:
 *
 *   head.S     entry after the "GenuineLguest" magic, interrupt stubs, iret
 *   main.c     boot: boot header, command line, then ping / block test / idle
 *   hcall.c    hypercalls, lguest_data, interrupts, the timer, the clock
 *   console.c  console output (SEND_DMA to key 0) and input
 *   devices.c  finding the device descriptors and mapping device pages
 *   net.c      the lguest_net driver (the shared MAC page and its slots)
 *   ip.c       ARP, IPv4, ICMP echo, UDP echo, the ping client's half
 *   block.c    the lguest block driver
 *   lib.c      memcpy and friends, printf-lite, do_div
 */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "lguest.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/*
 * Memory.  The Launcher maps all of RAM at PAGE_OFFSET and links us there
 * (at 1 MiB physical), so a kernel pointer minus PAGE_OFFSET is the physical
 * address the Host wants in hypercalls, DMA descriptors and keys.
 */
#define PAGE_OFFSET DEFAULT_PAGE_OFFSET
#define __pa(p) ((u32)(p) - PAGE_OFFSET)
#define __va(a) ((void *)((u32)(a) + PAGE_OFFSET))

/*
 * Device pages live outside RAM (the descriptor page at "mem", device pages
 * below LGUEST_GUEST_TOP), so the Launcher's linear mapping does not cover
 * them.  We map them ourselves in a 4 MiB window: its first page is the
 * descriptor page, the devices' pages follow in descriptor order.
 */
#define DEVICE_WINDOW 0xF0000000
#define MAX_RAM (DEVICE_WINDOW - PAGE_OFFSET)

#define barrier() asm volatile("" ::: "memory")
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define NSEC_PER_MSEC 1000000u
#define NSEC_PER_SEC 1000000000u

/* The frame head.S builds for every interrupt and trap. */
struct irq_frame {
	u32 edi, esi, ebp, esp, ebx, edx, ecx, eax;	/* pushal */
	u32 vector, error;
	u32 eip, cs, eflags;				/* pushed by the "CPU" */
};

/* head.S */
extern const u32 irq_stubs[LGUEST_IRQS + FIRST_EXTERNAL_VECTOR];
extern char lguest_noirq_start[], lguest_noirq_end[];
void lguest_halt(void);		/* enable interrupts and HALT, atomically */

/* hcall.c */
extern struct lguest_data lguest_data;
static inline u32 hcall(u32 call, u32 arg1, u32 arg2, u32 arg3)
{
	/* The Host reads eax/edx/ebx/ecx and answers in eax. */
	asm volatile("int $" "0x1f"
		     : "=a"(call)
		     : "a"(call), "d"(arg1), "b"(arg2), "c"(arg3)
		     : "memory");
	return call;
}
void lguest_init(void);
#define ASYNC_MADE (-1)		/* async_hcall(): the ring was full, the call is made */
int async_hcall(u32 call, u32 arg1, u32 arg2, u32 arg3);
int async_done(int n);
void async_flush(void);
void idt_init(void);
typedef void (*irq_handler_t)(unsigned int irq);
void request_irq(unsigned int irq, irq_handler_t handler);
void do_irq(struct irq_frame *frame);
u32 irq_save(void);
void irq_restore(u32 flags);
void irq_enable(void);
u64 now_ns(void);
void __attribute__((noreturn)) crash(const char *msg);
void wait_until(u64 deadline, int (*done)(void));

/* devices.c */
extern u32 ram_size;
void devices_init(u32 pgdir);
struct lguest_device_desc *find_device(u16 type, unsigned int nth,
				       unsigned int *index);
void *device_map(struct lguest_device_desc *desc);
void device_ready(struct lguest_device_desc *desc);

/* console.c */
void console_write(const char *s, unsigned int len);
void console_init(void);

/* net.c */
#define MAX_NET_DEVS 4
struct net_dev {
	int up;
	unsigned int irq, slot;
	u32 page_pa;			/* physical address of the net page */
	u8 (*macs)[ETH_ALEN];		/* the page, mapped: one MAC per slot */
	u8 mac[ETH_ALEN];
	int nocsum;
	u32 ip, netmask;
	u32 tx_packets, rx_packets, tx_carrier_errors, rx_length_errors;
	u32 rx_csum_errors;		/* frames a checksum showed damaged */
};
extern struct net_dev net_devs[];
extern unsigned int num_net_devs;
void net_init(int promisc, int csum);
u8 *net_tx_buffer(void);
void net_xmit(struct net_dev *dev, unsigned int len);
u32 net_peer_key(struct net_dev *dev);
unsigned int net_peer_count(struct net_dev *dev);
void net_publish(int promisc);
void arp_report(void);
void net_poll(void);
void net_report(void);

/* ip.c */
void eth_input(struct net_dev *dev, const u8 *frame, unsigned int len);
struct net_dev *route(u32 dst);
int arp_resolve(struct net_dev *dev, u32 ip, u64 timeout_ns);
void ping_send(struct net_dev *dev, u32 dst, u16 id, u16 seq);
struct ping_reply {
	u16 seq;
	u32 from;
	u64 rtt_ns;
};
int ping_take_reply(struct ping_reply *reply);
u32 parse_ip(const char **s);

/* block.c */
int block_init(void);
int block_io(int write, u32 sector, void *buf, u32 bytes);
u32 block_sectors(void);

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
u32 parse_uint(const char **s);
u32 do_div(u64 *n, u32 base);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void print_ms(char *buf, size_t size, u64 ns);

static inline u16 htons(u16 x) { return (u16)((x << 8) | (x >> 8)); }
static inline u32 htonl(u32 x) { return __builtin_bswap32(x); }
#define ntohs htons
#define ntohl htonl
#define IP_FMT "%u.%u.%u.%u"
#define IP_ARGS(ip) (unsigned)((ip) >> 24), (unsigned)(((ip) >> 16) & 0xFF), \
		    (unsigned)(((ip) >> 8) & 0xFF), (unsigned)((ip) & 0xFF)

#endif /* KERNEL_H */
