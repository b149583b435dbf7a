package org.selfheal;

import io.netty.buffer.Unpooled;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.util.ReferenceCountUtil;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.util.Collection;
import java.util.List;
import java.util.Set;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Future;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkLoadManager;

/**
 * Work-around for TorchServe issue #2595 (open in 0.12.0): a custom endpoint runs on
 * WorkLoadManager's thread pool after Netty has already released the request, so
 * {@code Request.getInputStream()} fails with IllegalReferenceCountException and a plugin
 * cannot read a POST body.
 *
 * <p>This wraps that pool: a task submitted by HttpRequestHandlerChain for a custom endpoint
 * (a lambda that captures the FullHttpRequest) gets the request retained before it is queued
 * and released after it ran. Every other task passes through untouched. Installed by reflection
 * once ModelManager exists (it is created after plugins load); TorchServe is pinned to 0.12.0.
 *
 * <p>The same place answers the methods the serving SDK has no hook for (PATCH, HEAD, OPTIONS, ...)
 * on the feedback route: TorchServe would throw inside the task and answer 500; here they get 405
 * (OPTIONS 204) with an Allow header, before the task runs.
 */
final class RequestBodyFix implements ExecutorService {
    private static final String CHAIN_LAMBDA = "org.pytorch.serve.http.HttpRequestHandlerChain$$Lambda";
    private static final Set<String> SDK_METHODS = Set.of("GET", "POST", "PUT", "DELETE");
    private static final String FEEDBACK_ROUTE = "/feedback";
    private static volatile boolean installed;

    private final ExecutorService delegate;

    private RequestBodyFix(ExecutorService delegate) {
        this.delegate = delegate;
    }

    static boolean isInstalled() {
        return installed;
    }

    /** Install into ModelManager's WorkLoadManager once; false while ModelManager does not exist yet. */
    static synchronized boolean install() {
        if (installed) {
            return true;
        }
        ModelManager manager = ModelManager.getInstance();
        if (manager == null) {
            return false;
        }
        try {
            Field wlmField = ModelManager.class.getDeclaredField("wlm");
            wlmField.setAccessible(true);
            WorkLoadManager wlm = (WorkLoadManager) wlmField.get(manager);
            Field poolField = WorkLoadManager.class.getDeclaredField("threadPool");
            poolField.setAccessible(true);
            ExecutorService pool = (ExecutorService) poolField.get(wlm);
            if (!(pool instanceof RequestBodyFix)) {
                poolField.set(wlm, new RequestBodyFix(pool));
            }
            installed = true;
            return true;
        } catch (ReflectiveOperationException | RuntimeException e) {
            throw new IllegalStateException("cannot install the request-body fix (TorchServe other than 0.12.0?)", e);
        }
    }

    /** Poll in a daemon thread until ModelManager exists, then install. */
    static void installWhenReady() {
        Thread t = new Thread(() -> {
            for (int i = 0; i < 6000 && !install(); i++) {
                try {
                    Thread.sleep(50);
                } catch (InterruptedException e) {
                    return;
                }
            }
        }, "selfheal-request-body-fix");
        t.setDaemon(true);
        t.start();
    }

    private static <T> T captured(Runnable task, Class<T> type) {
        if (!task.getClass().getName().startsWith(CHAIN_LAMBDA)) {
            return null;
        }
        for (Field f : task.getClass().getDeclaredFields()) {
            if (type.isAssignableFrom(f.getType())) {
                try {
                    f.setAccessible(true);
                    return type.cast(f.get(task));
                } catch (ReflectiveOperationException | RuntimeException e) {
                    return null;
                }
            }
        }
        return null;
    }

    /** The answer to a method the SDK cannot route on the feedback route; null for everything else. */
    private static Runnable unroutable(Runnable task, FullHttpRequest req) {
        String method = req.method().name();
        String uri = req.uri();
        if (SDK_METHODS.contains(method) || uri == null
                || !(uri.equals(FEEDBACK_ROUTE) || uri.startsWith(FEEDBACK_ROUTE + "/"))) {
            return null;
        }
        ChannelHandlerContext ctx = captured(task, ChannelHandlerContext.class);
        if (ctx == null) {
            return null;
        }
        boolean options = method.equals("OPTIONS");
        String allow = uri.contains("/quarantine") ? "POST" : "GET, POST";
        String json = "{\"code\": 405, \"type\": \"MethodNotAllowed\", \"message\": \"" + "method not allowed on "
                + "the feedback route: use " + allow + "\"}";
        byte[] body = options || method.equals("HEAD") ? new byte[0] : json.getBytes(StandardCharsets.US_ASCII);
        return () -> {
            FullHttpResponse rsp = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1,
                    options ? HttpResponseStatus.NO_CONTENT : HttpResponseStatus.METHOD_NOT_ALLOWED,
                    Unpooled.wrappedBuffer(body));
            rsp.headers().set(HttpHeaderNames.ALLOW, allow);
            rsp.headers().set(HttpHeaderNames.CONTENT_TYPE, "application/json");
            NettyUtils.sendHttpResponse(ctx, rsp, true);
        };
    }

    @Override
    public void execute(Runnable task) {
        FullHttpRequest req = captured(task, FullHttpRequest.class);
        Runnable answer = req == null ? null : unroutable(task, req);
        if (answer != null) {
            delegate.execute(answer);
            return;
        }
        if (req == null || req.refCnt() == 0) {
            delegate.execute(task);
            return;
        }
        req.retain();
        try {
            delegate.execute(() -> {
                try {
                    task.run();
                } finally {
                    ReferenceCountUtil.release(req);
                }
            });
        } catch (RejectedExecutionException e) {
            ReferenceCountUtil.release(req);
            throw e;
        }
    }

    @Override
    public void shutdown() {
        delegate.shutdown();
    }

    @Override
    public List<Runnable> shutdownNow() {
        return delegate.shutdownNow();
    }

    @Override
    public boolean isShutdown() {
        return delegate.isShutdown();
    }

    @Override
    public boolean isTerminated() {
        return delegate.isTerminated();
    }

    @Override
    public boolean awaitTermination(long timeout, TimeUnit unit) throws InterruptedException {
        return delegate.awaitTermination(timeout, unit);
    }

    @Override
    public <T> Future<T> submit(Callable<T> task) {
        return delegate.submit(task);
    }

    @Override
    public <T> Future<T> submit(Runnable task, T result) {
        return delegate.submit(task, result);
    }

    @Override
    public Future<?> submit(Runnable task) {
        return delegate.submit(task);
    }

    @Override
    public <T> List<Future<T>> invokeAll(Collection<? extends Callable<T>> tasks) throws InterruptedException {
        return delegate.invokeAll(tasks);
    }

    @Override
    public <T> List<Future<T>> invokeAll(Collection<? extends Callable<T>> tasks, long timeout, TimeUnit unit)
            throws InterruptedException {
        return delegate.invokeAll(tasks, timeout, unit);
    }

    @Override
    public <T> T invokeAny(Collection<? extends Callable<T>> tasks) throws InterruptedException, ExecutionException {
        return delegate.invokeAny(tasks);
    }

    @Override
    public <T> T invokeAny(Collection<? extends Callable<T>> tasks, long timeout, TimeUnit unit)
            throws InterruptedException, ExecutionException, TimeoutException {
        return delegate.invokeAny(tasks, timeout, unit);
    }
}
