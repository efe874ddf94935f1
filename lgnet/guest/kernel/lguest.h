/*
 * lguest.h - the lguest 2.6.23 ABI, as this kernel sees it.
 *
 * This is the kernel's one ABI header: every number the Host, the Launcher and
 * this Guest must agree on is here, and nowhere else in the kernel.  The source
 * of truth is lgnet/abi.py; this file mirrors it, name for name, and
 * tests/test_kernel_build.py checks that every #define below still has the
 * same value there.  Change abi.py first, then this file.
 *
 * Plain "#define NAME value" lines only (the test reads them); the C structs
 * at the bottom are hidden from the assembler.
 */
#ifndef LGUEST_H
#define LGUEST_H

#define PAGE_SIZE 4096

/* §1 DMA: a struct lguest_dma names up to 16 guest-physical pieces. */
#define LGUEST_MAX_DMA_SECTIONS 16
#define LGUEST_IRQS 32
#define LGUEST_CONSOLE_DMA_KEY 0
#define TIMER_IRQ 0
#define LGUEST_DMA_SIZE 100
#define BIND_NUM_SHIFT 8

/* §4 Hypercalls: "int $0x1f", eax = call, edx/ebx/ecx = arguments. */
#define LGUEST_TRAP_ENTRY 0x1F
#define LHCALL_FLUSH_ASYNC 0
#define LHCALL_LGUEST_INIT 1
#define LHCALL_CRASH 2
#define LHCALL_LOAD_GDT 3
#define LHCALL_NEW_PGTABLE 4
#define LHCALL_FLUSH_TLB 5
#define LHCALL_LOAD_IDT_ENTRY 6
#define LHCALL_SET_STACK 7
#define LHCALL_TS 8
#define LHCALL_SET_CLOCKEVENT 9
#define LHCALL_HALT 10
#define LHCALL_BIND_DMA 12
#define LHCALL_SEND_DMA 13
#define LHCALL_SET_PTE 14
#define LHCALL_SET_PMD 15
#define LHCALL_LOAD_TLS 16

/* struct lguest_data: the page the Guest shares with the Host. */
#define LHCALL_RING_SIZE 64
#define HCALL_STATUS_EMPTY 0xFF
#define LGUEST_DATA_IRQ_ENABLED 0
#define LGUEST_DATA_BLOCKED_INTERRUPTS 4
#define LGUEST_DATA_CR2 8
#define LGUEST_DATA_TIME 12
#define LGUEST_DATA_HCALL_STATUS 20
#define LGUEST_DATA_HCALLS 84
#define LGUEST_DATA_RESERVE_MEM 1108
#define LGUEST_DATA_GUESTID 1112
#define LGUEST_DATA_TSC_KHZ 1116
#define LGUEST_DATA_NOIRQ_START 1120
#define LGUEST_DATA_NOIRQ_END 1124
#define LGUEST_DATA_SIZE 1128
#define IRQ_ENABLED_ON 0x200
#define FIRST_EXTERNAL_VECTOR 32

/* The Guest kernel runs in ring 1, with the Host's flat segments. */
#define GUEST_PL 1
#define LGUEST_KERNEL_CS 0x61
#define LGUEST_KERNEL_DS 0x69

/* §6 Devices: 12-byte descriptors in the page just above RAM. */
#define LGUEST_DEVICE_DESC_SIZE 12
#define LGUEST_DEVICE_T_NONE 0
#define LGUEST_DEVICE_T_CONSOLE 1
#define LGUEST_DEVICE_T_NET 2
#define LGUEST_DEVICE_T_BLOCK 3
#define LGUEST_NET_F_NOCSUM 0x4000
#define LGUEST_DEVICE_F_RANDOMNESS 0x8000
#define NET_SLOT_FEATURE_MASK 0x3FFF
#define LGUEST_DEVICE_S_ACKNOWLEDGE 1
#define LGUEST_DEVICE_S_DRIVER 2
#define LGUEST_DEVICE_S_DRIVER_OK 4
#define LGUEST_DEVICE_S_FAILED 128
#define LGUEST_GUEST_TOP 0xB8000000

/* The net page: 682 six-byte MAC slots; key of slot n = page + 4 * n. */
#define ETH_ALEN 6
#define NET_SLOTS 682
#define NET_PROMISC_BIT 0x01
#define NET_PEER_KEY_STRIDE 4
#define ETH_HLEN 14
#define ETH_DATA_LEN 1500
#define ETH_FRAME_LEN 1514
#define NUM_NET_RX_BUFFERS 8

/* struct lguest_block_page */
#define BLOCK_TYPE_READ 0
#define BLOCK_TYPE_WRITE 1
#define BLOCK_RESULT_PENDING 0
#define BLOCK_RESULT_DONE 1
#define BLOCK_RESULT_ERROR 2
#define SECTOR_SIZE 512

#define CONSOLE_INPUT_BYTES 256

/* §7 Boot: the Linux boot header the Launcher writes at physical 0. */
#define PAGE_PRESENT 0x7
#define PGDIR_SHIFT 22
#define PTES_PER_PAGE 1024
#define BOOT_E820_COUNT 0x1E8
#define BOOT_E820_MAP 0x2D0
#define E820_RAM 1
#define BOOT_INITRD_SIZE 0x21C
#define BOOT_CMDLINE_PTR 0x228
#define BOOT_PARAVIRT_TYPE 0x23C
#define PARAVIRT_LGUEST 1
#define KERNEL_LOAD_ADDRESS 0x100000
#define DEFAULT_PAGE_OFFSET 0xC0000000
#define CRASH_MESSAGE_MAX 128
#define MSG_POWER_DOWN "Power down"

#ifndef __ASSEMBLER__
#include <stdint.h>

/* A struct lguest_dma: used_len is written by the Host (0 = free). */
struct lguest_dma {
	uint32_t used_len;
	uint32_t addr[LGUEST_MAX_DMA_SECTIONS];
	uint16_t len[LGUEST_MAX_DMA_SECTIONS];
};

/* One entry of the asynchronous hypercall ring. */
struct hcall_args {
	uint32_t eax, edx, ebx, ecx;
};

struct lguest_data {
	uint32_t irq_enabled;		/* 0x200 (IF) = the Host may interrupt us */
	uint32_t blocked_interrupts;	/* one bit per irq we do not want */
	uint32_t cr2;			/* the faulting address of a page fault */
	uint32_t tv_sec, tv_nsec;	/* wall time: the Host updates it */
	uint8_t hcall_status[LHCALL_RING_SIZE];
	struct hcall_args hcalls[LHCALL_RING_SIZE];
	uint32_t reserve_mem;
	uint16_t guestid;		/* our index in the Host's table */
	uint16_t pad;
	uint32_t tsc_khz;
	uint32_t noirq_start, noirq_end;  /* never interrupt EIP in here */
};

struct lguest_device_desc {
	uint16_t type, features, status, num_pages;
	uint32_t pfn;
};

struct lguest_block_page {
	int32_t type;
	uint32_t sector;
	uint32_t bytes;
	int32_t result;
	uint32_t num_sectors;
};
#endif /* __ASSEMBLER__ */
#endif /* LGUEST_H */
