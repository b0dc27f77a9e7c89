# Declarations of the compiled NBD framing, for other _fast modules to cimport.

from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef void put_u16(unsigned char *p, uint16_t v) noexcept nogil
cdef void put_u32(unsigned char *p, uint32_t v) noexcept nogil
cdef void put_u64(unsigned char *p, uint64_t v) noexcept nogil
cdef uint16_t get_u16(const unsigned char *p) noexcept nogil
cdef uint32_t get_u32(const unsigned char *p) noexcept nogil
cdef uint64_t get_u64(const unsigned char *p) noexcept nogil
