/* patio_tls.h - TLS transport for patio.h (mbedTLS).
 *
 * Not available yet: including this file stops the build with a message, so
 * that nobody mistakes it for a working TLS layer. */
#ifndef PATIO_TLS_H
#define PATIO_TLS_H
#error "patio_tls.h: TLS support is not implemented yet in this version of patio.h"
#endif
