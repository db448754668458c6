/*
 * tvmedge_rpc_server: a TVM RPC server for devices without Python (tvmedge's riscv64 boards).
 *
 * Speaks the protocol of TVM's Python server (tvm/rpc/server.py) so the host's tracker,
 * client and MetaSchedule runner use it unchanged: registers with an RPC tracker under a
 * key (UPDATE_INFO, PUT with a random match key, GET_PENDING_MATCHKEYS pings and a fresh
 * key when the old one goes stale), accepts a client whose handshake carries the match
 * key, and serves each session in a forked child running the runtime's own RPC endpoint
 * (RPCEndpoint::ServerLoop) inside a private work folder. A session that crashes ends
 * only its child; the server logs it and serves the next one. "-timeout=S" in the
 * client's key limits a session to S seconds, as in TVM's server.
 *
 * Usage: tvmedge_rpc_server --host H --port P --key K [--tracker H:P] [--custom-addr A]
 *        [--device-info JSON]   (what the board is: answered by the global "tvmedge.device_info")
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "src/runtime/rpc/rpc_endpoint.h"

namespace {

constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kTrackerMagic = 0x2F271;
constexpr int kCodeSuccess = 0, kCodePut = 3, kCodeUpdateInfo = 5, kCodeGetPendingMatchKeys = 7;
constexpr int kPingMs = 2000;
constexpr int kStaleAfterMs = 4000 + kPingMs;  // as TVM's server: re-key a match key unused this long

void Log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void Log(const char* fmt, ...) {
  char stamp[32];
  time_t now = time(nullptr);
  strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", localtime(&now));
  fprintf(stderr, "%s INFO ", stamp);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  fflush(stderr);
}

[[noreturn]] void Die(const std::string& msg) {
  fprintf(stderr, "error: %s\n", msg.c_str());
  fflush(stderr);
  exit(1);
}

bool SendAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool RecvAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool SendInt(int fd, int32_t v) { return SendAll(fd, &v, 4); }  // little endian, as struct.pack("<i")
bool RecvInt(int fd, int32_t* v) { return RecvAll(fd, v, 4); }

bool SendJson(int fd, const std::string& json) {
  return SendInt(fd, static_cast<int32_t>(json.size())) && SendAll(fd, json.data(), json.size());
}

bool RecvJson(int fd, std::string* json) {
  int32_t n;
  if (!RecvInt(fd, &n) || n < 0 || n > (1 << 24)) return false;
  json->resize(static_cast<size_t>(n));
  return n == 0 || RecvAll(fd, &(*json)[0], static_cast<size_t>(n));
}

std::string Quote(const std::string& s) {  // keys and addresses: no characters JSON must escape
  return "\"" + s + "\"";
}

int Connect(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

/*! \brief RPC channel over a connected socket */
class SocketChannel final : public tvm::runtime::RPCChannel {
 public:
  explicit SocketChannel(int fd) : fd_(fd) {}
  ~SocketChannel() { close(fd_); }
  size_t Send(const void* data, size_t size) final {
    for (;;) {
      ssize_t n = send(fd_, data, size, MSG_NOSIGNAL);
      if (n >= 0) return static_cast<size_t>(n);
      if (errno != EINTR) TVM_FFI_THROW(RuntimeError) << "RPC socket send failed: " << strerror(errno);
    }
  }
  size_t Recv(void* data, size_t size) final {
    for (;;) {
      ssize_t n = recv(fd_, data, size, 0);
      if (n >= 0) return static_cast<size_t>(n);
      if (errno != EINTR) TVM_FFI_THROW(RuntimeError) << "RPC socket recv failed: " << strerror(errno);
    }
  }

 private:
  int fd_;
};

struct Options {
  std::string host = "127.0.0.1";
  int port = 9090;
  std::string key;
  std::string tracker_host;
  int tracker_port = 0;
  std::string custom_addr;
  std::string device_info;
};

class Server {
 public:
  explicit Server(Options opt) : opt_(std::move(opt)), rng_(std::random_device{}()) {}

  void Run() {
    Listen();
    for (;;) {
      int conn = -1;
      double timeout = 0;
      if (!AcceptClient(&conn, &timeout)) continue;
      Serve(conn, timeout);
    }
  }

 private:
  void Listen() {
    addrinfo hints{}, *res = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    if (getaddrinfo(opt_.host.c_str(), std::to_string(opt_.port).c_str(), &hints, &res) != 0 || !res) {
      Die("cannot resolve host " + opt_.host);
    }
    listen_fd_ = socket(res->ai_family, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listen_fd_, res->ai_addr, res->ai_addrlen) != 0) {
      Die("cannot bind to " + opt_.host + ":" + std::to_string(opt_.port) + ": " + strerror(errno));
    }
    freeaddrinfo(res);
    if (listen(listen_fd_, 8) != 0) Die(std::string("listen failed: ") + strerror(errno));
    Log("bind to %s:%d", opt_.host.c_str(), opt_.port);
  }

  std::string NewMatchKey() {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    char buf[64];
    snprintf(buf, sizeof(buf), "%.17g", u(rng_));
    return opt_.key + ":" + buf;
  }

  void CloseTracker() {
    if (tracker_fd_ >= 0) close(tracker_fd_);
    tracker_fd_ = -1;
  }

  bool TrackerConnect() {
    if (opt_.tracker_host.empty() || tracker_fd_ >= 0) return true;
    tracker_fd_ = Connect(opt_.tracker_host, opt_.tracker_port);
    int32_t magic = 0;
    std::string reply;
    std::string addr = opt_.custom_addr.empty() ? "null" : Quote(opt_.custom_addr);
    if (tracker_fd_ < 0 || !SendInt(tracker_fd_, kTrackerMagic) || !RecvInt(tracker_fd_, &magic)) {
      CloseTracker();
      Log("cannot reach the RPC tracker at %s:%d; retrying", opt_.tracker_host.c_str(), opt_.tracker_port);
      sleep(1);
      return false;
    }
    if (magic != kTrackerMagic) Die(opt_.tracker_host + ":" + std::to_string(opt_.tracker_port) + " is not an RPC tracker");
    std::string info = "[" + std::to_string(kCodeUpdateInfo) + ", {\"key\": " + Quote("server:" + opt_.key) +
                       ", \"addr\": [" + addr + ", " + std::to_string(opt_.port) + "]}]";
    if (!SendJson(tracker_fd_, info) || !RecvJson(tracker_fd_, &reply) || reply != std::to_string(kCodeSuccess)) {
      CloseTracker();
      return false;
    }
    return true;
  }

  bool Put() {
    std::string addr = opt_.custom_addr.empty() ? "null" : Quote(opt_.custom_addr);
    std::string msg = "[" + std::to_string(kCodePut) + ", " + Quote(opt_.key) + ", [" + std::to_string(opt_.port) +
                      ", " + Quote(match_key_) + "], " + addr + "]";
    std::string reply;
    return SendJson(tracker_fd_, msg) && RecvJson(tracker_fd_, &reply) && reply == std::to_string(kCodeSuccess);
  }

  /*! \brief wait for a client that presents the current match key; false to go round again */
  bool AcceptClient(int* conn_out, double* timeout_out) {
    if (!TrackerConnect()) return false;
    if (tracker_fd_ >= 0) {
      match_key_ = NewMatchKey();
      if (!Put()) {
        CloseTracker();
        return false;
      }
    } else {
      match_key_ = opt_.key;
    }
    int unmatched_ms = 0;
    for (;;) {
      pollfd pfd{listen_fd_, POLLIN, 0};
      int ready = poll(&pfd, 1, tracker_fd_ >= 0 ? kPingMs : -1);
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0) {  // idle: is our match key still pending at the tracker?
        std::string pending;
        if (!SendJson(tracker_fd_, "[" + std::to_string(kCodeGetPendingMatchKeys) + "]") ||
            !RecvJson(tracker_fd_, &pending)) {
          CloseTracker();
          return false;
        }
        unmatched_ms = pending.find(Quote(match_key_)) == std::string::npos ? unmatched_ms + kPingMs : 0;
        if (unmatched_ms > kStaleAfterMs) {
          Log("no incoming connections, regenerate key ...");
          match_key_ = NewMatchKey();
          if (!Put()) {
            CloseTracker();
            return false;
          }
          unmatched_ms = 0;
        }
        continue;
      }
      sockaddr_storage peer{};
      socklen_t len = sizeof(peer);
      int conn = accept(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &len);
      if (conn < 0) continue;
      int32_t magic = 0, keylen = 0;
      if (!RecvInt(conn, &magic) || magic != kRPCMagic || !RecvInt(conn, &keylen) || keylen < 0 || keylen > 4096) {
        close(conn);
        continue;
      }
      std::string key(static_cast<size_t>(keylen), '\0');
      if (keylen && !RecvAll(conn, &key[0], static_cast<size_t>(keylen))) {
        close(conn);
        continue;
      }
      // "client:<match key> [-timeout=S]"
      std::vector<std::string> words;
      for (size_t i = 0; i < key.size();) {
        size_t j = key.find(' ', i);
        if (j == std::string::npos) j = key.size();
        if (j > i) words.push_back(key.substr(i, j - i));
        i = j + 1;
      }
      if (words.empty() || words[0] != "client:" + match_key_) {
        SendInt(conn, kRPCMagic + 2);
        close(conn);
        Log("mismatch key from a client");
        continue;
      }
      std::string server_key = "server:" + opt_.key;
      if (!SendInt(conn, kRPCMagic) || !SendInt(conn, static_cast<int32_t>(server_key.size())) ||
          !SendAll(conn, server_key.data(), server_key.size())) {
        close(conn);
        continue;
      }
      *timeout_out = 0;
      for (size_t i = 1; i < words.size(); ++i) {
        if (words[i].rfind("-timeout=", 0) == 0) *timeout_out = atof(words[i].c_str() + 9);
      }
      *conn_out = conn;
      return true;
    }
  }

  void Serve(int conn, double timeout) {
    char tmpl[] = "/tmp/tvmedge-rpc-XXXXXX";
    char* dir = mkdtemp(tmpl);
    if (dir == nullptr) Die(std::string("cannot create a session folder: ") + strerror(errno));
    std::string workdir = dir;
    Log("connected; start serving at %s", workdir.c_str());
    pid_t pid = fork();
    if (pid < 0) Die(std::string("fork failed: ") + strerror(errno));
    if (pid == 0) {
      close(listen_fd_);
      if (tracker_fd_ >= 0) close(tracker_fd_);
      if (chdir(workdir.c_str()) != 0) _exit(3);
      if (timeout > 0) alarm(static_cast<unsigned>(std::ceil(timeout)));
      RunSession(conn, workdir);
      _exit(0);
    }
    close(conn);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(status)) {
      Log("session ended by signal %d (%s)", WTERMSIG(status),
          WTERMSIG(status) == SIGALRM ? "session timeout" : strsignal(WTERMSIG(status)));
    } else if (WEXITSTATUS(status) != 0) {
      Log("session exited with code %d", WEXITSTATUS(status));
    }
    std::string rm = "rm -rf '" + workdir + "'";
    if (system(rm.c_str()) != 0) Log("cannot remove %s", workdir.c_str());
    Log("finish serving");
  }

  static void RunSession(int conn, const std::string& workdir) {
    namespace refl = tvm::ffi::reflection;
    refl::GlobalDef()
        .def("tvm.rpc.server.workpath", [workdir](std::string name) { return workdir + "/" + name; })
        .def("tvm.rpc.server.load_module", [workdir](std::string name) {
          std::string path = name.size() && name[0] == '/' ? name : workdir + "/" + name;
          Log("load_module %s", path.c_str());
          return tvm::ffi::Module::LoadFromFile(path);
        });
    try {
      tvm::runtime::RPCEndpoint::Create(std::make_unique<SocketChannel>(conn), "SockServerLoop", "")->ServerLoop();
    } catch (const std::exception& e) {
      Log("session error: %s", e.what());
      _exit(2);
    }
  }

  Options opt_;
  std::mt19937_64 rng_;
  int listen_fd_ = -1;
  int tracker_fd_ = -1;
  std::string match_key_;
};

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--host") {
      opt.host = value();
    } else if (a == "--port") {
      opt.port = atoi(value().c_str());
    } else if (a == "--key") {
      opt.key = value();
    } else if (a == "--custom-addr") {
      opt.custom_addr = value();
    } else if (a == "--device-info") {
      opt.device_info = value();
    } else if (a == "--tracker") {
      std::string t = value();
      size_t colon = t.rfind(':');
      if (colon == std::string::npos) Die("--tracker wants HOST:PORT, got " + t);
      opt.tracker_host = t.substr(0, colon);
      opt.tracker_port = atoi(t.c_str() + colon + 1);
    } else if (a == "--help" || a == "-h") {
      printf("usage: %s --host H --port P --key K [--tracker H:P] [--custom-addr A] [--device-info JSON]\n", argv[0]);
      return 0;
    } else {
      Die("unknown argument " + a);
    }
  }
  if (opt.key.empty()) Die("--key is required");
  if (!opt.device_info.empty()) {
    // tvmedge.deploy.session.device_info asks every session for it (emulated boards say so)
    std::string info = opt.device_info;
    tvm::ffi::Function::SetGlobal(
        "tvmedge.device_info", tvm::ffi::Function::FromTyped([info]() { return tvm::ffi::String(info); }), true);
  }
  signal(SIGPIPE, SIG_IGN);
  Server(opt).Run();
  return 0;
}
